"""Inputs: the request schema, image downloads (SSRF-guarded), decoding with bounded work, the job budget
and the resize to the network."""
