"""Models: choosing attention, building a model from the config, loading, exporting and sampling."""
