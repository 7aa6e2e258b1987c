"""Options of the one pipeline for models larger than one GPU holds: ``distributed`` (ranks, shards of
the calibration samples, all-reduced scores), ``sharding`` (FSDP2 decoder layers), ``offload`` (decoder
layers streamed from host memory), ``activation_offload`` (checkpointed layer inputs in host memory)."""
