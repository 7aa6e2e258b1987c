"""What a run writes and reads back: ``paths`` (the one ownership rule: what may be written, replaced or
deleted; atomic writes), ``save`` (the pruned model folder, its report and model card), ``gguf_export``
(a pruned GGUF), ``run_state`` (resume: fingerprint, checkpoint, RNG)."""
