"""kvmsplit: a reference model of KVM's x86 MMU and its eager page splitting.

The reference MMU lives in this package, one module per kernel concept
(spte.py, role.py, mmu_page.py, rmap.py, memslot.py, shadow_mmu.py,
paging_tmpl.py, tdp_mmu.py, mmu.py, split.py, x86.py), with kvm.py holding
the VM state.  Named invariants live in properties/ and model variants in
models/, installed as kvmsplit.properties and kvmsplit.models.
"""

__version__ = "0.1.0"
