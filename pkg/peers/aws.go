package peers

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"

	"github.com/aws/aws-sdk-go-v2/aws"
	awsconfig "github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/feature/ec2/imds"
	"github.com/aws/aws-sdk-go-v2/service/autoscaling"
	astypes "github.com/aws/aws-sdk-go-v2/service/autoscaling/types"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	ec2types "github.com/aws/aws-sdk-go-v2/service/ec2/types"
)

// AWS finds peers among the instances of an EC2 Auto Scaling group: the group's InService and
// Pending instances, by private IP, at the gossip port. Region and group default to this
// instance's own, read from the instance metadata service (IMDSv2).
type AWS struct {
	// Region and AutoScalingGroup; empty means "this instance's".
	Region           string
	AutoScalingGroup string
	// Endpoint overrides the Auto Scaling and EC2 API endpoint (tests, VPC endpoints).
	Endpoint string
	// IMDSEndpoint overrides the instance metadata endpoint (tests).
	IMDSEndpoint string
	// Port is the peers' gossip port.
	Port int
	// Config is the base AWS config; nil loads the default chain (instance role on EC2).
	Config *aws.Config
	Log    *slog.Logger

	mu       sync.Mutex
	resolved bool
	asg      *autoscaling.Client
	ec2      *ec2.Client
	group    string
}

// Discover returns the peers' gossip addresses (host:port), this instance included. Call it
// again to retry: what it learned once (region, group, clients) is kept.
func (a *AWS) Discover(ctx context.Context) ([]string, error) {
	if err := a.init(ctx); err != nil {
		return nil, err
	}
	a.mu.Lock()
	asgc, ec2c, group := a.asg, a.ec2, a.group
	a.mu.Unlock()

	var ids []string
	out, err := asgc.DescribeAutoScalingGroups(ctx, &autoscaling.DescribeAutoScalingGroupsInput{AutoScalingGroupNames: []string{group}})
	if err != nil {
		return nil, fmt.Errorf("describe auto scaling group %s: %w", group, err)
	}
	if len(out.AutoScalingGroups) == 0 {
		return nil, fmt.Errorf("auto scaling group %q not found; check peers.aws.autoScalingGroup and peers.aws.region", group)
	}
	for _, in := range out.AutoScalingGroups[0].Instances {
		switch in.LifecycleState {
		case astypes.LifecycleStateInService, astypes.LifecycleStatePending, astypes.LifecycleStatePendingWait, astypes.LifecycleStatePendingProceed:
			ids = append(ids, aws.ToString(in.InstanceId))
		}
	}
	if len(ids) == 0 {
		return nil, nil
	}
	var addrs []string
	p := ec2.NewDescribeInstancesPaginator(ec2c, &ec2.DescribeInstancesInput{InstanceIds: ids})
	for p.HasMorePages() {
		page, err := p.NextPage(ctx)
		if err != nil {
			return nil, fmt.Errorf("describe instances of %s: %w", group, err)
		}
		for _, r := range page.Reservations {
			for _, in := range r.Instances {
				if in.State != nil && in.State.Name != ec2types.InstanceStateNameRunning && in.State.Name != ec2types.InstanceStateNamePending {
					continue
				}
				if ip := aws.ToString(in.PrivateIpAddress); ip != "" {
					addrs = append(addrs, net.JoinHostPort(ip, strconv.Itoa(a.Port)))
				}
			}
		}
	}
	slices.Sort(addrs)
	return addrs, nil
}

func (a *AWS) init(ctx context.Context) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.resolved {
		return nil
	}
	var cfg aws.Config
	if a.Config != nil {
		cfg = a.Config.Copy()
	} else {
		var err error
		if cfg, err = awsconfig.LoadDefaultConfig(ctx); err != nil {
			return fmt.Errorf("aws config: %w", err)
		}
	}
	var md *imds.Client
	meta := func() *imds.Client {
		if md == nil {
			md = imds.NewFromConfig(cfg, func(o *imds.Options) {
				if a.IMDSEndpoint != "" {
					o.Endpoint = a.IMDSEndpoint
				}
			})
		}
		return md
	}
	region := a.Region
	if region == "" {
		region = cfg.Region
	}
	if region == "" {
		r, err := meta().GetRegion(ctx, &imds.GetRegionInput{})
		if err != nil {
			return fmt.Errorf("peers.aws.region not set and instance metadata unavailable: %w", err)
		}
		region = r.Region
	}
	cfg.Region = region
	endpoint := func(o *string) *string {
		if a.Endpoint != "" {
			return aws.String(a.Endpoint)
		}
		return o
	}
	asgc := autoscaling.NewFromConfig(cfg, func(o *autoscaling.Options) { o.BaseEndpoint = endpoint(o.BaseEndpoint) })
	ec2c := ec2.NewFromConfig(cfg, func(o *ec2.Options) { o.BaseEndpoint = endpoint(o.BaseEndpoint) })
	group := a.AutoScalingGroup
	if group == "" {
		out, err := meta().GetMetadata(ctx, &imds.GetMetadataInput{Path: "instance-id"})
		if err != nil {
			return fmt.Errorf("peers.aws.autoScalingGroup not set and instance metadata unavailable: %w", err)
		}
		b, err := io.ReadAll(io.LimitReader(out.Content, 256))
		out.Content.Close()
		if err != nil {
			return fmt.Errorf("read instance id: %w", err)
		}
		id := strings.TrimSpace(string(b))
		res, err := asgc.DescribeAutoScalingInstances(ctx, &autoscaling.DescribeAutoScalingInstancesInput{InstanceIds: []string{id}})
		if err != nil {
			return fmt.Errorf("find the auto scaling group of instance %s: %w", id, err)
		}
		if len(res.AutoScalingInstances) == 0 {
			return errors.New("this instance (" + id + ") is not in an auto scaling group; set peers.aws.autoScalingGroup or use peers.seeds")
		}
		group = aws.ToString(res.AutoScalingInstances[0].AutoScalingGroupName)
	}
	a.asg, a.ec2, a.group, a.resolved = asgc, ec2c, group, true
	if a.Log != nil {
		a.Log.Info("finding peers in the auto scaling group", "region", region, "group", group)
	}
	return nil
}
