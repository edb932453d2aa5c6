"""Names of the files a BiomedGPT model directory may hold besides the Hugging Face ones.

A module of constants only, so that the checkpoint tools can name these files without importing the data pipeline
(pyarrow, PIL, streaming), which a machine that only consolidates checkpoints may not have.
"""

TASK_FILE = "finetune_task.json"  # how a model directory was fine-tuned (biomedgpt.data.finetune_tasks.write_task_file)
