"""The GPT model shared by pretraining and sampling, and its parts."""
