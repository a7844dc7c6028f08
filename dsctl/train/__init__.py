"""Trainers: stage I (supernet), stage II (gate), static baselines, and their shared machinery."""
