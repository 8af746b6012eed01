//! libftrepl.so: preloaded into unmodified programs, it reports the changes they make to files
//! under replicated paths to the pump (through libft's operation ring).
