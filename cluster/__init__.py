"""Driver side of shardserve: placement, the engine client and the offline LLM."""

from cluster.llm import LLM
from cluster.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from workers.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "RequestMetrics", "CompletionOutput", "Logprob"]
