"""Partitioning: what each stage holds (:class:`StagePlan`), made by a partitioner from the model.

``plan.py`` (the plan and the partitioner contract), ``sequential.py`` (an ``nn.Sequential``
cut into contiguous runs of layers), ``graph.py`` (any module ``torch.export`` captures, cut
into units that run one after another), ``balance.py`` (the optimal min-max split),
``profile.py`` (timing layers and stages on their device).
"""
from .balance import min_max_partition
from .graph import GraphSplit, partitioner_for
from .plan import Partitioner, StagePlan
from .profile import LayerFailed, profile_layers, time_module
from .sequential import SequentialSplit, balance_by_params, check_balance, check_unshared, layers_of, split

__all__ = ["GraphSplit", "LayerFailed", "Partitioner", "SequentialSplit", "StagePlan", "balance_by_params",
           "check_balance", "check_unshared", "layers_of", "min_max_partition", "partitioner_for", "profile_layers",
           "split", "time_module"]

