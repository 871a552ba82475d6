"""One node put together: its services, its options and the twistd plugin's maker."""
