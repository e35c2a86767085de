package bpf

//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -Wall -Werror -nostdinc -Iinclude" -target bpfel -type route_key -type route_value -type backend -type orig_dst -type counter -type backend_state Redirect redirect.c
//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -Wall -Werror -nostdinc -Iinclude" -target bpfel Destroy destroy.c
