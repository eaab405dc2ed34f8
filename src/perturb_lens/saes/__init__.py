"""saes."""
