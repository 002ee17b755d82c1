"""Sampling: which regions an epoch reads, in which order, and which rank reads them."""

from loader_service.sampling.candidates import CandidateCache, Candidates, SlideGeometry
from loader_service.sampling.elastic import ResumeStages, ShardMap
from loader_service.sampling.plan import (EpochPlan, Sample, SampleRun, ShardCursor, reads_by_mpp, sample_rng,
                                          sample_scale)
from loader_service.sampling.spec import BALANCES, MODES, SamplingSpec

__all__ = ["BALANCES", "MODES", "CandidateCache", "Candidates", "EpochPlan", "ResumeStages", "Sample", "SampleRun",
           "SamplingSpec", "ShardCursor", "ShardMap", "SlideGeometry", "reads_by_mpp", "sample_rng",
           "sample_scale"]
