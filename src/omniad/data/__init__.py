"""Image readers, the synthetic multi-type generator and evaluation protocols."""
