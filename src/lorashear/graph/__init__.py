"""Dependency graph of minimally removable structures."""

from .groups import (GROUP_KINDS, Group, GroupKind, ParamSlice, RmsScale, StructureGraph, count_removed_params,
                     removal_plan, zero_groups)

__all__ = ["GROUP_KINDS", "Group", "GroupKind", "ParamSlice", "RmsScale", "StructureGraph", "count_removed_params",
           "removal_plan", "zero_groups"]
