"""Scoring: which MLP channels a method keeps.

``registry`` lists the methods (built-in and registered) as entries of one shape; ``selection`` holds
the shapes they share (``ScoringRun`` in, ``Selection`` out, ``top_channels``); ``taylor`` runs the
gradient methods' passes over the calibration batches (``passes`` holds their shared mechanics) with
the importance engines of ``importance``; ``baselines`` scores the one-shot methods.
"""
