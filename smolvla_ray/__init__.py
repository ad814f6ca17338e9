"""smolvla-ray: distributed finetuning of LeRobot's SmolVLA policy on Ray."""

__version__ = "0.1.0"
