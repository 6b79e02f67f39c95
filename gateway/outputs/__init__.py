"""Outputs: depth to every task's encoded output (images, PLY, GLB) and the names of the response keys. Pure."""
