"""One module per screen; each screen's widgets live beside it."""
