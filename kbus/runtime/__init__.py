"""kbus.runtime."""
