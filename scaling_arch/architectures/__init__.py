"""One module per architecture that needs code beyond gin (the vanilla baseline needs none)."""
