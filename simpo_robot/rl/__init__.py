"""Online fine-tuning: one trainer (`trainer.py`) with algorithms plugged in (`simpo.py`)."""
