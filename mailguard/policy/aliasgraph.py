"""Alias chains, flattened: the graph part of building the user directory.

``mailguard.policy.directorybuild.build`` turns the alias records into a graph --
each alias address (a key) with its edges: ``("user", canonical)``,
``("fwd", address)`` or ``("alias", key)`` -- and L{flatten} resolves every
alias to the accounts and forwards it finally reaches, reporting each loop
once, so a lookup never walks a chain.
"""

from __future__ import annotations

from mailguard.config.problems import Problem

__all__ = ["flatten"]


def flatten(nodes, edges, problems):
    """Resolve every alias to (accounts, forwards), both tuples in order.

    Tarjan's strongly connected components, iteratively (no recursion
    limit): a component is finished only after everything it reaches, so
    each alias is resolved once.  Every component that is a cycle is an
    alias loop, reported once with its chain; its members deliver to
    everything the loop reaches.
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    component_of: dict[str, int] = {}
    results: dict[int, tuple[dict, dict]] = {}
    counter = 0

    for root in nodes:
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
            out = edges[node]
            recurse = False
            while i < len(out):
                kind, target = out[i]
                i += 1
                if kind != "alias":
                    continue
                if target not in index:
                    work.append((node, i))
                    work.append((target, 0))
                    recurse = True
                    break
                if target in on_stack:
                    low[node] = min(low[node], index[target])
            if recurse:
                continue
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                members = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    members.append(member)
                    if member == node:
                        break
                members.reverse()
                cid = len(results)
                for member in members:
                    component_of[member] = cid
                results[cid] = _resolve_component(members, edges, component_of, results, cid)
                member_set = set(members)
                if len(members) > 1 or ("alias", node) in edges[node]:
                    start = min(members, key=lambda m: index[m])
                    chain = _cycle(start, edges, member_set)
                    problems.append(
                        Problem(nodes[start].where, "alias loop: " + " -> ".join(chain))
                    )

    flat = {cid: (tuple(mail), tuple(fwd)) for cid, (mail, fwd) in results.items()}
    return {key: flat[component_of[key]] for key in nodes}


def _resolve_component(members, edges, component_of, results, cid):
    mailboxes: dict[str, None] = {}
    forwards: dict[str, None] = {}
    for member in members:
        for kind, target in edges[member]:
            if kind == "user":
                mailboxes[target] = None
            elif kind == "fwd":
                forwards[target] = None
            elif component_of.get(target) != cid:
                sub_mail, sub_fwd = results[component_of[target]]
                mailboxes.update(sub_mail)
                forwards.update(sub_fwd)
    return mailboxes, forwards


def _cycle(start, edges, members):
    """The shortest chain from C{start} back to itself inside C{members}."""
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for kind, target in edges[node]:
                if kind != "alias" or target not in members:
                    continue
                if target == start:
                    chain = [start]
                    while node != start:
                        chain.append(node)
                        node = previous[node]
                    return [start, *reversed(chain[1:]), start]
                if target not in previous:
                    previous[target] = node
                    nxt.append(target)
        frontier = nxt
    return [start, start]  # unreachable for a real component
