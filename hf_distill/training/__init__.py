"""What one training step needs besides the KD signal, one idea per module:

- teacher.py       the teacher is a guest: frozen, placed, run under no_grad, read under sharding
- pairing.py       teacher/student checks before training: heads, label orders, vocabularies, layer maps
- task_loss.py     what a model's outputs mean (the task kind) and the student's own (hard) loss
- matching.py      hidden-state and attention matching: layer maps, learned projections and their checkpoints
- accumulation.py  normalising every term over the whole gradient-accumulation window
- on_policy.py     the student's own samples for on-policy (GKD) steps
- checkpoints.py   which checkpoints are complete, and what `resume_from_checkpoint` means
- data_checks.py   bad training data, refused before the first step
- evaluation.py    multi-process prediction trimming
- processes.py     ending a multi-process run on every rank together
- batches.py       what the models are called with (the batch without its targets)
- logged_terms.py  the loss components logged beside `loss`
- cpu_memory.py    on CPU, freed memory kept for the next step (glibc's malloc thresholds)

May import losses/, storage/ and args.py; sources/, trainer.py and mutual.py import it.
"""
