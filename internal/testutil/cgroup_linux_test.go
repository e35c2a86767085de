package testutil

import (
	"errors"
	"os"
	"path/filepath"
	"sync"
	"testing"
)

// Test packages run as parallel processes that share one parent cgroup: one
// may remove the parent (its last child just went) while another is between
// creating the parent and creating its child in it. Here several goroutines
// play those packages on a parent of their own, as fast as they can.
func TestSharedCgroupParentSurvivesConcurrentCreateAndRemove(t *testing.T) {
	parent := filepath.Join(NewCgroup(t).Path, "shared")
	const workers, rounds = 8, 300
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for range workers {
		wg.Go(func() {
			for range rounds {
				path, err := mkdirUnder(parent, UniqueName("c"))
				if err == nil {
					err = os.Remove(path)
				}
				if err == nil {
					err = removeIfEmpty(parent)
				}
				if err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if err := removeIfEmpty(parent); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(parent); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the shared parent must be gone once its last child is: %v", err)
	}
}
