"""What is served: the model table both the exporter and the gateway read (pure: no heavy imports)."""
