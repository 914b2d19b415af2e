"""Model: draw the MMU state after one step of a trace, for `kvmsplit show`.

The picture follows what a KVM developer reads in a crash dump: the roots,
then each shadow page (struct kvm_mmu_page) by level and role, its non-leaf
SPTEs as links to child pages and its leaf SPTEs as the gfns they map.  What
the step changed is marked: new pages, SPTEs whose value changed, pages
freed.  Large states stay readable: consecutive leaves that map consecutive
gfns to consecutive pfns with the same permission bits print as one run,
and consecutive child pages that each hold one such run of 512 print as one
line, so a 1 GiB split shows as a handful of lines rather than 262,144.

Two renderings: text for a terminal and Graphviz DOT for a picture (svg or
png through the `dot` program).
"""

from __future__ import annotations

import html
from typing import Any

import attrs

from kvmsplit.kvm import Kvm
from kvmsplit.mmu_page import kvm_mmu_page_get_gfn
from kvmsplit.spte import (
    KVM_PAGES_PER_HPAGE,
    PT_WRITABLE_MASK,
    SPTE_BASE_ADDR_MASK,
    is_large_pte,
    is_shadow_present_pte,
    spte_to_pfn,
)

# A run of this many or more uniform child pages prints as one line.
MIN_COLLAPSED_CHILDREN = 4


@attrs.frozen
class SpView:
    """A shadow page as captured: role, place, and its 512 SPTEs."""

    pfn: int
    tdp_mmu_page: bool
    level: int
    gfn: int
    direct: bool
    guest_mode: bool
    invalid: bool
    unsync: bool
    root_count: int
    role_word: int
    spt: tuple[int, ...]
    # The gfn each present leaf maps (kvm_mmu_page_get_gfn()), by index.
    leaf_gfns: dict[int, int]

    def describe(self) -> str:
        kind = "tdp" if self.tdp_mmu_page else "shadow"
        flags = ["direct" if self.direct else "indirect"]
        if self.guest_mode:
            flags.append("guest_mode")
        if self.invalid:
            flags.append("invalid")
        if self.unsync:
            flags.append("unsync")
        if self.root_count:
            flags.append(f"root_count={self.root_count}")
        return (
            f"{kind} sp L{self.level} gfn {self.gfn:#x} {' '.join(flags)} (pfn {self.pfn:#x}, role {self.role_word:#x})"
        )


@attrs.frozen
class MmuState:
    pages: dict[int, SpView]
    # Which vCPU contexts point at which root (by the root's pfn).
    root_users: dict[int, list[str]]
    stats: dict[str, int]
    n_used_mmu_pages: int
    dirty_mask: int
    x_mask: int
    nx_mask: int


def capture(kvm: Kvm) -> MmuState:
    """Copy what the drawing needs out of @kvm (the VM keeps running afterwards)."""
    pages = {}
    for pfn, sp in kvm.sp_by_pfn.items():
        spt = tuple(sp.spt)
        leaf_gfns = {}
        for index, spte in enumerate(spt):
            if is_shadow_present_pte(spte) and (sp.role.level == 1 or is_large_pte(spte)):
                leaf_gfns[index] = kvm_mmu_page_get_gfn(sp, index)
        pages[pfn] = SpView(
            pfn=pfn,
            tdp_mmu_page=sp.tdp_mmu_page,
            level=sp.role.level,
            gfn=sp.gfn,
            direct=sp.role.direct,
            guest_mode=sp.role.guest_mode,
            invalid=sp.role.invalid,
            unsync=sp.unsync,
            root_count=sp.root_count,
            role_word=sp.role.word,
            spt=spt,
            leaf_gfns=leaf_gfns,
        )
    users: dict[int, list[str]] = {}
    for v in kvm.vcpus:
        for ctx in (v.root_mmu, v.guest_mmu):
            if ctx.root is not None:
                users.setdefault(ctx.root.pfn, []).append(f"vcpu{v.vcpu_id} {ctx.name}")
    m = kvm.masks
    return MmuState(
        pages=pages,
        root_users=users,
        stats=kvm.stat.as_dict(),
        n_used_mmu_pages=kvm.n_used_mmu_pages,
        dirty_mask=m.shadow_dirty_mask,
        x_mask=m.shadow_x_mask,
        nx_mask=m.shadow_nx_mask,
    )


# --- the tree both renderings draw -------------------------------------------------------


@attrs.frozen
class LeafRun:
    first: int
    last: int
    level: int
    gfn: int
    pfn: int
    flags: str
    changed: bool

    @property
    def count(self) -> int:
        return self.last - self.first + 1

    def describe(self) -> str:
        size = {1: "4K", 2: "2M", 3: "1G"}.get(self.level, f"L{self.level}")
        step = KVM_PAGES_PER_HPAGE(self.level)
        span = self.count * step
        where = f"[{self.first}]" if self.count == 1 else f"[{self.first}..{self.last}]"
        what = f"{size} leaf" if self.count == 1 else f"{self.count} x {size} leaves"
        if span == 1:
            target = f"gfn {self.gfn:#x} -> pfn {self.pfn:#x}"
        else:
            target = f"gfn {self.gfn:#x}-{self.gfn + span - 1:#x} -> pfn {self.pfn:#x}-{self.pfn + span - 1:#x}"
        return f"{where} {what}: {target}{' ' + self.flags if self.flags else ''}"


@attrs.frozen
class Link:
    index: int
    child: PageNode | None  # None: points at no page table the model knows
    target_pfn: int
    changed: bool


@attrs.frozen
class LinkRun:
    """Consecutive child pages, each holding nothing but one full run of leaves."""

    first: int
    last: int
    level: int
    gfn: int
    pfn: int
    flags: str
    changed: bool
    new: bool

    def describe(self) -> str:
        n = self.last - self.first + 1
        size = {1: "4K", 2: "2M", 3: "1G"}.get(self.level, f"L{self.level}")
        span = n * 512 * KVM_PAGES_PER_HPAGE(self.level)
        return (
            f"[{self.first}..{self.last}] -> {n} L{self.level} pages, each 512 x {size} leaves: "
            f"gfn {self.gfn:#x}-{self.gfn + span - 1:#x} -> pfn {self.pfn:#x}-{self.pfn + span - 1:#x}"
            f"{' ' + self.flags if self.flags else ''}"
        )


@attrs.frozen
class Other:
    index: int
    spte: int
    changed: bool


@attrs.frozen
class Removed:
    """SPTEs the step cleared, consecutive indices merged."""

    first: int
    last: int
    spte: int  # the first one's old value

    def describe(self) -> str:
        if self.first == self.last:
            return f"[{self.first}] cleared (was {self.spte:#x})"
        n = self.last - self.first + 1
        return f"[{self.first}..{self.last}] {n} SPTEs cleared (the first was {self.spte:#x})"


@attrs.frozen
class PageNode:
    sp: SpView
    new: bool
    items: tuple[Any, ...]


def _flags(state: MmuState, spte: int) -> str:
    out = []
    # Bit 1 is W in both the EPT and the x86 layout.
    if spte & PT_WRITABLE_MASK:
        out.append("W")
    if state.dirty_mask and spte & state.dirty_mask:
        out.append("D")
    if state.nx_mask:
        if not spte & state.nx_mask:
            out.append("X")
    elif state.x_mask and spte & state.x_mask:
        out.append("X")
    return "".join(out)


def _leaf_items(state: MmuState, sp: SpView, before: SpView | None) -> list[Any]:
    items: list[Any] = []
    cur: dict[str, Any] | None = None
    step = KVM_PAGES_PER_HPAGE(sp.level)
    for index, spte in enumerate(sp.spt):
        old = before.spt[index] if before is not None else 0
        changed = before is None or old != spte
        present = is_shadow_present_pte(spte)
        if present and sp.level > 1 and not is_large_pte(spte):
            cur = None
            continue  # a link, added by the caller
        if not present:
            cur = None
            if spte:
                items.append(Other(index, spte, changed))
            elif old and is_shadow_present_pte(old):
                prev = items[-1] if items else None
                if isinstance(prev, Removed) and prev.last == index - 1:
                    items[-1] = Removed(prev.first, index, prev.spte)
                else:
                    items.append(Removed(index, index, old))
            continue
        gfn, pfn, flags = sp.leaf_gfns[index], spte_to_pfn(spte), _flags(state, spte)
        attr_bits = spte & ~SPTE_BASE_ADDR_MASK
        if (
            cur is not None
            and cur["last"] == index - 1
            and cur["next_gfn"] == gfn
            and cur["next_pfn"] == pfn
            and cur["bits"] == attr_bits
            and cur["changed"] == changed
        ):
            cur["last"] = index
            cur["next_gfn"] += step
            cur["next_pfn"] += step
            items[-1] = LeafRun(cur["first"], index, sp.level, cur["gfn"], cur["pfn"], flags, changed)
            continue
        cur = {
            "first": index,
            "last": index,
            "gfn": gfn,
            "pfn": pfn,
            "next_gfn": gfn + step,
            "next_pfn": pfn + step,
            "bits": attr_bits,
            "changed": changed,
        }
        items.append(LeafRun(index, index, sp.level, gfn, pfn, flags, changed))
    return items


def build_tree(after: MmuState, before: MmuState | None) -> tuple[list[PageNode], list[SpView]]:
    """The page tables reachable from each root, and the pages freed by the step."""
    pointed_at: set[int] = set()
    for sp in after.pages.values():
        if sp.level == 1:
            continue
        for spte in sp.spt:
            if is_shadow_present_pte(spte) and not is_large_pte(spte):
                pointed_at.add(spte_to_pfn(spte))
    roots = [sp for pfn, sp in after.pages.items() if pfn not in pointed_at]
    roots.sort(key=lambda sp: (not sp.tdp_mmu_page, -sp.level, sp.pfn))
    seen: set[int] = set()

    def node(sp: SpView) -> PageNode:
        seen.add(sp.pfn)
        old = before.pages.get(sp.pfn) if before is not None else None
        new = before is not None and old is None
        leaf_items = {getattr(i, "first", getattr(i, "index", 0)): i for i in _leaf_items(after, sp, old)}
        links: dict[int, Any] = {}
        if sp.level > 1:
            for index, spte in enumerate(sp.spt):
                if is_shadow_present_pte(spte) and not is_large_pte(spte):
                    target = spte_to_pfn(spte)
                    child = after.pages.get(target)
                    changed = old is None or old.spt[index] != spte
                    sub = node(child) if child is not None and target not in seen else None
                    links[index] = Link(index, sub, target, changed)
        items = [v for _, v in sorted((leaf_items | links).items())]
        return PageNode(sp, new, tuple(_collapse(items)))

    trees = [node(sp) for sp in roots if sp.pfn not in seen]
    freed = [] if before is None else [sp for pfn, sp in before.pages.items() if pfn not in after.pages]
    return trees, freed


def _uniform(link: Any) -> LeafRun | None:
    """The single full run of leaves a linked page holds, if that is all it holds."""
    if not isinstance(link, Link) or link.child is None or len(link.child.items) != 1:
        return None
    run = link.child.items[0]
    if isinstance(run, LeafRun) and run.count == 512:
        return run
    return None


def _collapse(items: list[Any]) -> list[Any]:
    out: list[Any] = []
    i = 0
    while i < len(items):
        j = i
        first = _uniform(items[i])
        while first is not None and j + 1 < len(items):
            nxt, prev = _uniform(items[j + 1]), _uniform(items[j])
            assert prev is not None
            span = 512 * KVM_PAGES_PER_HPAGE(prev.level)
            if (
                nxt is None
                or items[j + 1].index != items[j].index + 1
                or nxt.gfn != prev.gfn + span
                or nxt.pfn != prev.pfn + span
                or nxt.flags != prev.flags
                or nxt.changed != prev.changed
                or items[j + 1].child.new != items[i].child.new
                or items[j + 1].changed != items[i].changed
            ):
                break
            j += 1
        if first is not None and j - i + 1 >= MIN_COLLAPSED_CHILDREN:
            out.append(
                LinkRun(
                    items[i].index,
                    items[j].index,
                    first.level,
                    first.gfn,
                    first.pfn,
                    first.flags,
                    first.changed or items[i].changed,
                    items[i].child.new,
                )
            )
            i = j + 1
            continue
        out.append(items[i])
        i += 1
    return out


# --- text ---------------------------------------------------------------------------------


def _root_label(state: MmuState, sp: SpView) -> str:
    users = state.root_users.get(sp.pfn)
    return f" [{', '.join(users)}]" if users else ""


def render_text(after: MmuState, before: MmuState | None, title: str, color: bool = False) -> str:
    """An indented tree; '*' marks what the step changed, '+' a page it allocated."""
    trees, freed = build_tree(after, before)
    lines = [title]
    n_tdp = sum(1 for sp in after.pages.values() if sp.tdp_mmu_page)
    lines.append(
        f"{len(trees)} root(s); {n_tdp} TDP MMU pages, {len(after.pages) - n_tdp} shadow MMU pages "
        f"(n_used_mmu_pages {after.n_used_mmu_pages})"
    )
    lines.append(
        "page stats: "
        + ", ".join(f"{k} {after.stats[k]}" for k in ("pages_4k", "pages_2m", "pages_1g") if k in after.stats)
    )
    if before is not None:
        lines.append("legend: * changed by this step, + page allocated by this step, - SPTE cleared by this step")
    lines.append("")

    def mark(changed: bool) -> str:
        return "* " if changed and before is not None else "  "

    def emit(text: str, changed: bool) -> None:
        if color and changed and before is not None:
            text = f"\x1b[1;33m{text}\x1b[0m"
        lines.append(text)

    def walk(n: PageNode, depth: int, prefix: str) -> None:
        pad = "  " * depth
        tag = "+ " if n.new else "  "
        root = _root_label(after, n.sp) if depth == 0 else ""
        emit(f"{tag}{pad}{prefix}{n.sp.describe()}{root}", n.new)
        for item in n.items:
            ipad = "  " * (depth + 1)
            if isinstance(item, Link):
                if item.child is None:
                    emit(
                        f"{mark(item.changed)}{ipad}[{item.index}] -> pfn {item.target_pfn:#x} (no page)", item.changed
                    )
                else:
                    if item.changed and not item.child.new:
                        emit(f"{mark(True)}{ipad}[{item.index}] relinked:", True)
                    walk(item.child, depth + 1, f"[{item.index}] -> ")
            elif isinstance(item, LinkRun) and item.new and before is not None:
                emit(f"+ {ipad}{item.describe()} (allocated by this step)", True)
            elif isinstance(item, (LeafRun, LinkRun)):
                emit(f"{mark(item.changed)}{ipad}{item.describe()}", item.changed)
            elif isinstance(item, Other):
                emit(f"{mark(item.changed)}{ipad}[{item.index}] non-present SPTE {item.spte:#x}", item.changed)
            elif isinstance(item, Removed):
                emit(f"- {ipad}{item.describe()}", True)

    for tree in trees:
        walk(tree, 0, "")
    if freed:
        lines.append("")
        lines.append(f"freed by this step: {len(freed)} page(s)")
        for sp in freed[:16]:
            lines.append(f"- {sp.describe()}")
        if len(freed) > 16:
            lines.append(f"  ... and {len(freed) - 16} more")
    return "\n".join(lines) + "\n"


# --- DOT ----------------------------------------------------------------------------------


def _q(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_dot(after: MmuState, before: MmuState | None, title: str) -> str:
    """A Graphviz digraph: pages as boxes, leaf runs as notes, changes in red."""
    trees, freed = build_tree(after, before)
    out = [
        "digraph kvm_mmu {",
        "  rankdir=LR;",
        f"  label={_q(title)}; labelloc=t; fontname=Helvetica;",
        "  node [fontname=Helvetica, fontsize=10]; edge [fontname=Helvetica, fontsize=9];",
    ]
    counter = [0]
    clusters: dict[str, list[str]] = {}

    def leaf_node(kind: str, label: str, changed: bool, shape: str = "note") -> str:
        counter[0] += 1
        name = f"leaves{counter[0]}"
        color = ", color=red, fontcolor=red, penwidth=2" if changed and before is not None else ""
        clusters.setdefault(kind, []).append(f"    {name} [shape={shape}, label={_q(label)}{color}];")
        return name

    def page(n: PageNode, clusters: dict[str, list[str]], is_root: bool) -> str:
        sp = n.sp
        name = f"sp_{sp.pfn:x}"
        kind = "tdp" if sp.tdp_mmu_page else "shadow"
        role = ["direct" if sp.direct else "indirect"]
        if sp.guest_mode:
            role.append("guest_mode")
        if sp.unsync:
            role.append("unsync")
        if sp.invalid:
            role.append("invalid")
        label = f"<<b>L{sp.level} {kind} sp</b><br/>gfn {sp.gfn:#x}<br/>{' '.join(role)}<br/>pfn {sp.pfn:#x}"
        users = after.root_users.get(sp.pfn)
        if users:
            label += "<br/>" + html.escape(", ".join(users))
        label += ">"
        style = ["shape=box", "style=filled"]
        if n.new and before is not None:
            style += ['fillcolor="#ffd6d6"', "color=red", "penwidth=2"]
        elif is_root:
            style += ['fillcolor="#d6e6ff"', "peripheries=2"]
        else:
            style += ['fillcolor="#f4f4f4"']
        clusters.setdefault(kind, []).append(f"    {name} [label={label}, {', '.join(style)}];")
        for item in n.items:
            red = (
                ", color=red, fontcolor=red, penwidth=2"
                if getattr(item, "changed", False) and before is not None
                else ""
            )
            if isinstance(item, Link):
                if item.child is None:
                    target = leaf_node(kind, f"pfn {item.target_pfn:#x}\n(no page table)", item.changed)
                else:
                    target = page(item.child, clusters, False)
                out.append(f"  {name} -> {target} [label={_q(f'[{item.index}]')}{red}];")
            elif isinstance(item, LeafRun):
                target = leaf_node(kind, item.describe().replace(": ", "\n").replace(" -> ", "\n-> "), item.changed)
                out.append(f"  {name} -> {target} [style=dashed{red}];")
            elif isinstance(item, LinkRun):
                n_pages = item.last - item.first + 1
                size = {1: "4K", 2: "2M", 3: "1G"}.get(item.level, f"L{item.level}")
                span = n_pages * 512 * KVM_PAGES_PER_HPAGE(item.level)
                label = (
                    f"{n_pages} x L{item.level} sp{' (new)' if item.new else ''}\neach 512 x {size} leaves\n"
                    f"gfn {item.gfn:#x}-{item.gfn + span - 1:#x}\n-> pfn {item.pfn:#x}-{item.pfn + span - 1:#x}"
                    f"{' ' + item.flags if item.flags else ''}"
                )
                target = leaf_node(kind, label, item.changed, "box3d")
                out.append(f"  {name} -> {target} [label={_q(f'[{item.first}..{item.last}]')}{red}];")
            elif isinstance(item, Other):
                target = leaf_node(kind, f"[{item.index}] non-present\n{item.spte:#x}", item.changed)
                out.append(f"  {name} -> {target} [style=dotted{red}];")
            elif isinstance(item, Removed):
                target = leaf_node(kind, item.describe().replace(" (", "\n("), True)
                out.append(f"  {name} -> {target} [style=dotted, color=red];")
        return name

    for tree in trees:
        page(tree, clusters, True)
    for kind, title_ in (("tdp", "TDP MMU"), ("shadow", "shadow MMU")):
        if kind in clusters:
            out.append(f"  subgraph cluster_{kind} {{")
            out.append(f"    label={_q(title_)}; style=rounded; color=gray;")
            out.extend(clusters[kind])
            out.append("  }")
    stats = ", ".join(f"{k} {after.stats[k]}" for k in ("pages_4k", "pages_2m", "pages_1g") if k in after.stats)
    out.append(f"  stats [shape=plaintext, label={_q('page stats: ' + stats)}];")
    if freed:
        text = f"freed by this step: {len(freed)} page(s)\n" + "\n".join(sp.describe() for sp in freed[:8])
        out.append(f"  freed [shape=note, color=red, fontcolor=red, label={_q(text)}];")
    out.append("}")
    return "\n".join(out) + "\n"
