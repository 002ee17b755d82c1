"""Sampling: which regions an epoch reads, in which order, and which rank reads them."""

from loader_service.sampling.candidates import CandidateCache, Candidates, SlideGeometry
from loader_service.sampling.elastic import ResumeStages, ShardMap
from loader_service.sampling.plan import (EpochPlan, RunGroups, Sample, SampleRun, ShardCursor, group_by_slide,
                                          reads_by_mpp, sample_rng, sample_scale)
from loader_service.sampling.spec import BALANCES, MODES, SamplingSpec

__all__ = ["BALANCES", "MODES", "CandidateCache", "Candidates", "EpochPlan", "ResumeStages", "RunGroups", "Sample", "SampleRun",
           "SamplingSpec", "ShardCursor", "ShardMap", "SlideGeometry", "group_by_slide", "reads_by_mpp", "sample_rng",
           "sample_scale"]
