"""Data preparation: every common format in; validated, cleaned, PII-scrubbed, deduplicated,
templated and split out. `prepare.run` is the stage; the other modules are its steps."""
