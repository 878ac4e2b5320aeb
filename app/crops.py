"""The max-crops range shared by the Model tab and the Train tab, so a model is fine-tuned with the same choice
of crops the app offers when it runs the model."""

MAX_CROPS_MIN = 1
MAX_CROPS_MAX = 36
MAX_CROPS_DEFAULT = 12  # the official checkpoints' preprocessor setting
