"""Generation: samplers that run trained models, the fused fast step, and the listening page."""
