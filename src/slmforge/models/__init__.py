"""Models: the network, chat format, scoring, pretrained bases, vocabulary."""
