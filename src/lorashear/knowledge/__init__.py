"""Knowledge distribution analysis (paper Alg. 3): find the node groups that must never be pruned.

    from lorashear.knowledge import KnowledgeConfig, analyze_knowledge, load_knowledge
    result = analyze_knowledge(model, graph, tokens, KnowledgeConfig(ratios=(0.2, 0.5), gamma=0.2))
    result.save(out_dir)                        # knowledge.json
    keep = load_knowledge(out_dir).unprunable_groups(graph)
"""

from .analysis import NodeGroup, SliceSnapshot, analyze_knowledge, deviation, masked, mean_token_nll, node_groups, rank_scores
from .proxies import PROXIES, Proxy, avg_magnitude_proxy, magnitude_proxy, random_proxy, register_proxy, resolve_proxy
from .config import KnowledgeConfig, num_to_prune, num_unprunable
from .plot import plot_knowledge
from .result import BLOCK_KINDS, KNOWLEDGE_FILENAME, KnowledgeResult, NodeGroupResult, load_knowledge

__all__ = [
    "BLOCK_KINDS", "KNOWLEDGE_FILENAME", "PROXIES", "KnowledgeConfig", "KnowledgeResult", "NodeGroup", "NodeGroupResult",
    "Proxy", "SliceSnapshot", "analyze_knowledge", "avg_magnitude_proxy", "deviation", "load_knowledge",
    "magnitude_proxy", "masked", "mean_token_nll", "node_groups", "num_to_prune", "num_unprunable",
    "plot_knowledge", "random_proxy", "rank_scores", "register_proxy", "resolve_proxy",
]
