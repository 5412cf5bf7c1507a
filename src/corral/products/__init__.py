"""Products: the container for devices, firmware, groups and the product team."""
