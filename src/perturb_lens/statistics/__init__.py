"""Fitted statistics: activation mean and covariance with their fit size (:mod:`.activations`,
:mod:`.fit_size`), the cache of a run's statistics (:mod:`.cache`) and the one bootstrap
(:mod:`.bootstrap`)."""
