"""Trainer bases shared by the trainers in ``trainers/`` (which nnU-Net imports by name)."""
