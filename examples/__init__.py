"""Runnable examples; a package so that job files can name ``examples.adding_rnn:make_model``."""
