"""Recovery after pruning: ``recover`` (the entries: ``finetune`` of a saved model, ``recover_masked_``
of a masked one), ``trainer`` (the training loop), ``lora`` (adapters on one weight copy), ``sft_data``
(instruction records or text -> packed rows)."""
