"""kbus.hw."""
