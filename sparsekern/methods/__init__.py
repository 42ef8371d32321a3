"""The survey's methods as block-aware mask producers (see ``blocks.py`` for the pooling they share)."""
