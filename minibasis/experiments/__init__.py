"""The paper's protocols as runnable experiments; each CLI verb is one module here."""
