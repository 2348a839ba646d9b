// Translation unit that carries Loom's precompiled header.
