"""Helpers the lm-eval task files in this folder name (``!function utils.digit_answers``)."""


def digit_answers(dataset):
    """The records whose answer is one digit (the multiple-choice task's choices are the digits)."""
    return dataset.filter(lambda doc: doc["gold"] >= 0)
