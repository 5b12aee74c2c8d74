"""Training-stability observatory: the metric math and the monitor callback that training
plugs in; it sits below ``training`` (what reads or drives runs is ``olmo_mini.analysis``)."""
