"""kbus.protocol."""
