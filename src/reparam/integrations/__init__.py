"""Bridges to other libraries, each in a module of its own that imports its
library only when used, so ``import reparam`` stays light."""
