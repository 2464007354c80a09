"""davserver: the restore views over store.view (not built yet)."""
