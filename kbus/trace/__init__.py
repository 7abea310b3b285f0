"""kbus.trace."""
