"""The realignment methods, one package each (math.py: pure tensor functions; the other modules:
its stages, touching files only through realign.io), registered in base.py; patch.py is the
driver every patching method runs through, alignment.py the one source of V = W_aligned - W_base."""
