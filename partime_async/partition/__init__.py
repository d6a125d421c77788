"""Partitioning: what each stage holds (:class:`StagePlan`), made by a partitioner from the model.

``plan.py`` (the plan and the partitioner contract), ``sequential.py`` (an ``nn.Sequential``
cut into contiguous runs of layers), ``balance.py`` (the optimal min-max split),
``profile.py`` (timing layers and stages on their device).
"""
from .balance import min_max_partition
from .plan import Partitioner, StagePlan
from .profile import LayerFailed, profile_layers, time_module
from .sequential import SequentialSplit, balance_by_params, check_balance, check_unshared, layers_of, split

__all__ = ["LayerFailed", "Partitioner", "SequentialSplit", "StagePlan", "balance_by_params", "check_balance",
           "check_unshared", "layers_of", "min_max_partition", "profile_layers", "split", "time_module"]
