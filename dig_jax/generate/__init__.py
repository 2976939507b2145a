"""Generation: prompt batches and their host-side layout, the KV-cache sampler, teacher-forced scoring."""
